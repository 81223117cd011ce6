"""What the front door and workers share: the event, settings, keys, queue format."""
