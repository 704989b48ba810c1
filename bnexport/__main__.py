from bnexport.cli import entry

entry()
