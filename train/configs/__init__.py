"""ml_collections configs: ``get_config()`` per file (``autoperi train --config FILE``)."""
