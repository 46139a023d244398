"""fleetlora's command line. The library lives in the role packages: export, edge_client, coordinator,
sim and devices (see ARCHITECTURE.md)."""

__version__ = "0.1.0"
