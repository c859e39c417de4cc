"""Running experiments, as the pipeline they are: settings -> plan -> execute, and what is built from it.

    settings.py     `RunSettings`: every setting of a run, declared once; the command line and each sweep cell build one
    shapes.py       a model's widths, positions and Linears from its config and a meta-device skeleton (no weights)
    plan.py         `plan(settings) -> Plan`: every name resolved and every value checked, row keys, what is done
    execute.py      `execute(plan)`: load the model once, quantize, evaluate, write rows; resolves no name again
    runner.py       `run(settings)`: the three in a row (`qharness run`)
    sweep.py        a grid of runs, every cell planned before the first runs; locally or on Ray
    scanning.py     one scan: profile, intervention, plots, rows (`qharness scan`)
    bench.py        each scheme's speed and memory (`qharness bench`)
    curve_sweep.py  train, evaluate and prune each run of a training-curve sweep (sweeps/tune400.yaml)
"""
