"""parity's harness: setups, planning, launchers and pools, comparison, localization, mutations,
result files. (The command line is parity.cli.)"""
