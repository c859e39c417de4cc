"""One run, as the pipeline it is: settings -> plan -> execute.

    settings.py  `RunSettings`: every setting of a run, declared once; the command line and each sweep cell build one
    shapes.py    a model's widths, positions and Linears from its config and a meta-device skeleton (no weights)
    plan.py      `plan(settings) -> Plan`: every name resolved and every value checked, row keys, what is done
    execute.py   `execute(plan)`: load the model once, quantize, evaluate, write rows; resolves no name again

`qharness.runner.run(settings)` is the three in a row; `qharness.sweep` plans every cell before it runs the first.
"""
