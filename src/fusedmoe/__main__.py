from fusedmoe.cli import entry

entry()
