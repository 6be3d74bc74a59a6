"""warmtune's service library: settings, model, stores, serving, queue, metrics, routes, CLI."""
