"""parity's harness: setups, launchers, comparison, localization, mutations and the CLI."""
