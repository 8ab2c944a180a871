"""The router: API gateway, traffic routing and the control plane (the app is ``router.app.create_app``)."""
