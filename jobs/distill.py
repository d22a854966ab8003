"""`specllava distill` (work in progress)."""
def add_parser(subparsers):
    p = subparsers.add_parser("distill", help="distill a draft (work in progress)")
    p.set_defaults(func=lambda a: 0)
    return p
