"""eval: forge webhooks -> `push.received`; flake evaluation workers -> `eval.done`."""
