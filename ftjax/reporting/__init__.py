"""What a run reports for people, read from its workdir's files: PNG plots of its curves (`plots`), TensorBoard's
HParams view (`hparams`) and the comparison of several runs (`compare`, `--mode=compare`). None of it builds or
trains anything; the callbacks and modes call it."""
