"""mesh: each node serves its store as a Nix binary cache and fetches from peers."""
