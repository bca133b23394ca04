"""The science behind sparsity: lottery tickets as first-class experiments.

* :mod:`speedup.lottery.imp`: iterative magnitude pruning with rewinding, by levels, with the
  controls (random reinitialisation, random pruning, layerwise shuffling);
* :mod:`speedup.lottery.pai`: pruning at initialisation (SNIP, GraSP, SynFlow, magnitude,
  random) with the sanity checks of "Missing the mark";
* :mod:`speedup.lottery.instability`: linear-mode-connectivity instability analysis;
* :mod:`speedup.lottery.scaling`: the pruning scaling law of Rosenfeld et al. (ICML 2021).

Each training run is :func:`speedup.lottery.runs.train_run` in its own directory; a finished
run is never recomputed, so an interrupted experiment resumes where it stopped.
"""
