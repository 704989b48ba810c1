from bnexport.cli import main

main(prog_name="bnexport")
