"""The model as jaxq edits it in place: quantizers (`fakequant`), functional taps, Conv+BN
folds (`fuse`), the transaction log, one parameter record per layer, preparation."""
