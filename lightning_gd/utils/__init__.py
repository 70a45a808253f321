"""Small helpers shared by the Lightning glue (plots, logging)."""
