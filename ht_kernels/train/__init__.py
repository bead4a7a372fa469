"""Training of draft heads on a frozen model (`python -m ht_kernels.train`): data, the distillation
objective, the training loop and the measurements of trained drafts. The drafters themselves live in
`drafts/`, which tree auto shares."""
