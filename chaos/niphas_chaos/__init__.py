"""`make chaos`: pushes through the whole pipeline while services are killed and NATS restarts."""
