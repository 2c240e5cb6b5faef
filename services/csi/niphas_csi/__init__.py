"""csi: CSI node plugin mounting a read-only view of exactly one closure."""
