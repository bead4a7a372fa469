"""Training of draft heads on a frozen model (`python -m ht_kernels.train`): data, objective, drafters,
the training loop and the measurements of trained drafts."""
