"""`mcp-sidecar store migrate --from SRC --to DST`: copy a session store to another backend.

Run it while no sidecar uses either store (a running one would keep writing to the source
after the copy). Locations are `sqlite:PATH` or a `redis://` / `rediss://` URL, either way
round. Progress goes to stderr every few thousand sessions; the last line on stdout says what
was copied, so a script can keep it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from .config import StoreSettings
from .config_render import mask_url_password
from .store.copy import Copied, copy_store, open_location, require_sqlite_file

# As in the config, so a store migrated with the defaults is the one a sidecar then opens.
DEFAULT_PREFIX: str = StoreSettings.model_fields["key_prefix"].default


def add_store_parser(commands: Any) -> None:
    store = commands.add_parser("store", help="copy sessions from one store to another")
    actions = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    migrate = actions.add_parser(
        "migrate",
        help="copy every session, tombstone and owed DELETE into an empty store",
        description="Locations: sqlite:PATH, redis://[:PASSWORD@]HOST:PORT/DB or rediss://...",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="LOCATION")
    migrate.add_argument("--to", dest="target", required=True, metavar="LOCATION")
    migrate.add_argument(
        "--key-prefix",
        default=DEFAULT_PREFIX,
        help=f"the Redis end's store.key_prefix (default: {DEFAULT_PREFIX})",
    )


def run_store(args: argparse.Namespace) -> int:
    return asyncio.run(migrate(args.source, args.target, args.key_prefix))


async def migrate(source_location: str, target_location: str, key_prefix: str) -> int:
    require_sqlite_file(source_location)
    source, source_name = open_location(source_location, key_prefix)
    target, target_name = open_location(target_location, key_prefix)
    started = time.monotonic()
    await source.open()
    try:
        await target.open()
        try:
            copied = await copy_store(source, target, _progress)
        finally:
            await target.close()
    finally:
        await source.close()
    elapsed = time.monotonic() - started
    print(
        f"copied {copied.summary()} from {mask_url_password(source_name)} to "
        f"{mask_url_password(target_name)} in {elapsed:.1f}s"
    )
    return 0


def _progress(copied: Copied) -> None:
    print(f"copied {copied.total} of {copied.expected} sessions", file=sys.stderr, flush=True)
