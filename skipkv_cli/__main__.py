from skipkv_cli.cli import app

app(prog_name="skipkv")
