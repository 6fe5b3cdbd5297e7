from alignmerge.cli import run

run()
