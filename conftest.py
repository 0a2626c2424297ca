"""Lets pytest import the top-level packages (model, dataloader, utils) from the repo root."""
