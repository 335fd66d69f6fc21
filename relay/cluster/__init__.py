"""Ray plumbing every layer shares, below `actors/`, `learners/` and `buffer/` so that none of them imports
`launch/`: actor options, names and namespace (`options`), remote calls with timeouts (`calls`).

Starting or attaching to a cluster is the driver's job and stays in `relay.launch.cluster`.
"""
