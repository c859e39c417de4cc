"""Where models come from (sources), which are built in (builtin), and where their decoder layers are (layers)."""
