"""The web demo's rule for server paths a visitor types: only inside the operator's --allow-paths
folders, judged after links and '..' are resolved, whatever the visitor's address."""
import os
from types import SimpleNamespace

import pytest

from regionspot.utils.allowed_paths import AllowedPaths, PathNotAllowed, check_config_file, looks_like_path


def _request(host):
    return SimpleNamespace(client=SimpleNamespace(host=host))


def test_inside_outside_links_and_dotdot(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (allowed / "a.yaml").write_text("MODEL: {}\n")
    (other / "secret.txt").write_text("secret\n")
    os.symlink(other / "secret.txt", allowed / "link.txt")  # a link inside that points outside
    policy = AllowedPaths([str(allowed)])
    assert policy.allows(str(allowed / "a.yaml"))
    assert not policy.allows(str(other / "secret.txt"))
    assert not policy.allows(str(allowed / "link.txt"))
    assert not policy.allows(str(allowed / ".." / "other" / "secret.txt"))
    assert not policy.allows(str(tmp_path / "allowed_sibling" / "x"))  # a prefix is not a parent
    assert not policy.allows("http://127.0.0.1:1/x.pth") and not policy.allows("")
    assert not AllowedPaths().allows(str(allowed / "a.yaml"))  # nothing allowed by default
    assert AllowedPaths(also=[str(other / "secret.txt")]).allows(str(other / "secret.txt"))


def test_a_visitor_from_another_address_is_refused_and_named(tmp_path):
    policy = AllowedPaths([str(tmp_path)])
    with pytest.raises(PathNotAllowed) as info:
        policy.check("/etc/passwd", "Vocabulary file", _request("192.0.2.7"))
    message = str(info.value)
    assert "/etc/passwd" in message and "192.0.2.7" in message and "--allow-paths" in message
    assert policy.check(str(tmp_path), "Folder", _request("192.0.2.7")) == str(tmp_path)
    with pytest.raises(PathNotAllowed, match="without --allow-paths"):
        AllowedPaths().check(str(tmp_path), "Checkpoint", _request("127.0.0.1"))


def test_overrides_that_name_files_are_checked(tmp_path):
    policy = AllowedPaths([str(tmp_path)])
    policy.check_overrides(["MODEL.DEVICE", "cpu", "MODEL.REGIONSPOT.SAM.TYPE", "vit_b",
                            "MODEL.REGIONSPOT.SAM.CHECKPOINT", str(tmp_path / "sam.pth")])
    for value in ("/etc/passwd", "~/.ssh/id_rsa", "http://127.0.0.1:9/x.pth", '[["d", "/data/a.json", "/data"]]'):
        with pytest.raises(PathNotAllowed, match="Config override"):
            policy.check_overrides(["MODEL.REGIONSPOT.SAM.CHECKPOINT", value])
    assert not looks_like_path("vit_b") and looks_like_path("a/b")


def test_a_non_config_file_is_named_with_what_was_expected(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ValueError) as info:
        check_config_file(str(passwd))
    assert str(passwd) in str(info.value) and "expected a YAML mapping of config keys" in str(info.value)
    binary = tmp_path / "w.pth"
    binary.write_bytes(b"\x80\x04\x95\xff\x00")
    with pytest.raises(ValueError, match="not a readable YAML config"):
        check_config_file(str(binary))
    good = tmp_path / "c.yaml"
    good.write_text("MODEL:\n  DEVICE: cpu\n")
    check_config_file(str(good))
