"""One module per job; each is the only place that touches Ray for its job. Models and
statistics (optirag.*) take arrays, tensors and small configs and know no Ray or storage;
optirag.artifacts owns every stored layout."""
