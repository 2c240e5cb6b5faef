"""builder: `eval.done` -> single-flight builds, signed cache push -> `build.done`."""
