"""The reporter: commit statuses on the forge and build logs over HTTP."""
