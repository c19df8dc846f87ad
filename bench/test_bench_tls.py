"""The TLS benchmark ``bench/tls.py``, quickly: one round of 1 s per mode and target.

Asserts nothing about speed. It checks what must hold whatever the speed:
both modes (new TLS connections, keep-alive over TLS) ran against nginx and
fastlb with the same certificate, every run was answered without a non-2xx
response or a socket error, CPU was read for every row, and fastlb's ratios
to nginx are in the table. Skipped without wrk, nginx, openssl or taskset.
"""
import json

import pytest

import e2e
import tls


def test_skips_with_install_hint_without_wrk(monkeypatch, capsys):
    real = e2e.find_tool
    monkeypatch.setattr(e2e, "find_tool", lambda name: None if name == "wrk" else real(name))
    assert tls.main(["--duration", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: wrk not installed")
    assert tls.INSTALL_HINT in out


def test_nginx_config_is_the_proxy_config_in_tls():
    conf = tls.nginx_tls_conf("/tmp/x", 8443, 9000, "/tmp/x/c.pem", "/tmp/x/c.key")
    assert "listen 127.0.0.1:8443 ssl backlog=4096;" in conf
    assert "ssl_certificate /tmp/x/c.pem;" in conf and "ssl_certificate_key /tmp/x/c.key;" in conf
    assert "server 127.0.0.1:9000;" in conf and "keepalive 64;" in conf


@pytest.mark.timeout(120)
def test_tls_handshakes_and_keep_alive_against_nginx(tmp_path, capsys):
    missing = tls.missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {tls.INSTALL_HINT}")
    js = tmp_path / "tls.json"
    status = tls.main(["--duration", "1", "--rounds", "1", "--warmup", "0",
                       "--connections", "16", "--json", str(js)])
    out = capsys.readouterr().out
    print(out)
    assert status == 0, out
    result = json.loads(js.read_text())
    targets = result["config"]["targets"]
    assert "nginx" in targets and any(t.startswith("fastlb") for t in targets)
    rows = {(r["mode"], r["target"]): r for r in result["rows"]}
    for mode in tls.MODES:
        for t in targets:
            r = rows[(mode, t)]
            assert r["requests"] > 0 and r["non2xx"] == 0 and r["socket_errors"] == 0, r
            assert r["cpu_us"] > 0, r
            assert f"{mode:<10} {t:<9} " in out
            if t != "nginx":
                assert r["rate_vs_nginx"] > 0 and r["cpu_vs_nginx"] > 0
