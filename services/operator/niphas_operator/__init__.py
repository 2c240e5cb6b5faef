"""operator: reconciles NiphasWorkload objects into Deployments that mount closures."""
