"""The cluster: Punica's consolidating placement and migration policy (pure), its deployment and
a simulator."""
