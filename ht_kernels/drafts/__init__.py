"""Drafts of a frozen model on teacher-forced sequences, the ground that tree auto (`decode.autotree`) and
training (`train/`) share: the drafter modules, the pass that runs every anchor's pseudo chain at once,
the examples they run on, and the prompts the project writes itself."""
