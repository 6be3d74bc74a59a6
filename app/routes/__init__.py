"""HTTP routes, one module per resource; app.api assembles them."""
