"""Multi-node mode on Ray (`dataflow run --ray`): a ledger actor wrapping control/ on the node that holds
the database, rollout actors feeding the Ray-object store, and one torch.distributed group of trainer
actors. Imported only by `dataflow run --ray`; the single-host commands never import ray."""
