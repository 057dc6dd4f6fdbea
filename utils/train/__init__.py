"""The training run behind train.py: the run itself (`run`), optimiser and schedule (`optim`), the loss (`loss`),
training states (`checkpoint`), the save_dir lock and resume checks (`savedir`), torchrun helpers
(`distributed`) and the CPU demo (`demo`)."""
