"""A demo backend as its own process, so tests can kill it: python backend_proc.py PORT NAME."""
import asyncio
import sys

from fastlb.demo import DemoBackend


async def main(port, name):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DemoBackend(name), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
