"""Pipeline stages. Each is a plain function `run_<stage>(cfg, rundir, ...) -> summary dict`;
nothing here parses arguments or prints, so the same code runs from the CLI, under
`accelerate launch`, in tests and in notebooks."""
