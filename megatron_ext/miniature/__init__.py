"""The miniature Devstral Audio: toy tasks, a trained tiny base and its two siblings (issue 20)."""
