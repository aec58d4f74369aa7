from dataflow.cli import app

app()
