"""selfsup's benchmarks and experiments behind one entry point: ``python -m benchmarks NAME [options]``.

Run from the repository root; they import the installed ``selfsup``. ``python -m benchmarks`` lists the
names, ``python -m benchmarks NAME --help`` shows one's options. What they share (the machine's description,
the commit, JSON results, timing, peak memory, device sync) is :mod:`benchmarks.common`; the results and
figures quoted in the README are in ``benchmarks/results/``.
"""

#: NAME -> the module whose ``main(argv)`` runs it: the benchmarks, then the experiments.
NAMES: dict[str, str] = {
    "lightly": "benchmarks.against_lightly",
    "methods": "benchmarks.methods",
    "augment": "benchmarks.augment",
    "decode": "benchmarks.decode",
    "patches": "benchmarks.patches",
    "probe": "benchmarks.probe",
    "stream": "benchmarks.stream",
    "gpu": "benchmarks.gpu",
    "speedrun": "benchmarks.experiments.speedrun",
    "batch_size": "benchmarks.experiments.batch_size",
    "relative_location": "benchmarks.experiments.relative_location",
}
