"""One Baton cluster member: config, election loop, leader-gated scheduler, HTTP API, metrics."""
