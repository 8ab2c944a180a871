"""Traditional models hosted in the router: manifests, runtimes, the dynamic batcher, the predict APIs."""
