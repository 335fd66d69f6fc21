"""Ray plumbing every layer shares, below `actors/`, `learners/` and `buffer/` so that none of them imports
`launch/`: actor options, names and namespace (`options`), remote calls with timeouts (`calls`), the device a
process computes on (`devices`), and placement: the pure plan from a config (`placement`), its fit against a
cluster's nodes (`fit`), and the placement groups that carry it out (`placement_groups`).

Starting or attaching to a cluster is the driver's job and stays in `relay.launch.cluster`.
"""
