"""One module per dialect: its routes, auth header, limits and error shape."""
