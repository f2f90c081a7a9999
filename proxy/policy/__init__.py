"""What a role may run and see: rules, roles, catalog, analysis, decisions, masks, limits."""
