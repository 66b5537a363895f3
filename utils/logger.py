"""Training dashboard on a visdom server.

The dashboard is a convenience: training must neither fail nor slow down because no visdom
server is running or because it goes away mid-run. So the port is probed with a short socket
timeout first, every request has a timeout, and the first failure prints one warning and
switches the dashboard off for the rest of the run.
"""
import html
import logging
import math
import re
import socket
import warnings
from urllib.parse import urlparse

_CONNECT_TIMEOUT = 1.0  # seconds to wait for the TCP handshake when probing the server
_REQUEST_TIMEOUT = (1.0, 5.0)  # (connect, read) seconds for every request to the server


def _make_client(server, port, env):
    """A visdom client whose requests time out and whose errors raise (instead of printing)."""
    import visdom

    # visdom logs a warning about the disabled incoming socket and about every new session;
    # neither matters here.
    logging.getLogger("visdom").setLevel(logging.ERROR)

    class _TimeoutVisdom(visdom.Visdom):
        # visdom posts without a timeout; a hung server would then hang training.
        def _handle_post(self, url, data=None):
            response = self.session.post(url, data=data if data is not None else {},
                                         timeout=_REQUEST_TIMEOUT)
            response.raise_for_status()
            return response.text

    with warnings.catch_warnings():
        # visdom 0.2.4 calls the deprecated Logger.warn while setting up.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _TimeoutVisdom(server=server, port=port, env=env, raise_exceptions=True,
                              use_incoming_socket=False)


def _port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def visdom_env_name(name):
    """The visdom environment name used for an experiment name.

    visdom reads '+' in an environment URL as "compare these environments" (so the default
    experiment "SCORER+CBR" would open as an empty comparison), and the name becomes a file
    name on the server: characters other than letters, digits, '.', '_' and '-' become '-'.
    """
    return re.sub(r"[^A-Za-z0-9._-]", "-", name) or "main"


class Dashboard:
    """Line plots and a caption pane in the visdom environment named after ``env``.

    ``dashboard.env`` is the environment name actually used (see visdom_env_name) and
    ``dashboard.url`` the page that shows it.

    Every method is a no-op once the dashboard is disabled (``enabled=False``, server not
    reachable, or a request failed).
    """

    def __init__(self, enabled, server, port, env):
        self.env = visdom_env_name(env)
        self.url = f"{server.rstrip('/')}:{port}/env/{self.env}"
        self._vis = None
        self._traces = {}  # window -> trace names in the order they were created
        if not enabled:
            return
        host = urlparse(server if "://" in server else f"http://{server}").hostname
        if not host or not _port_open(host, port):
            self._fail(f"no visdom server answers on {server}:{port}")
            return
        try:
            self._vis = _make_client(server, port, env)
        except Exception as err:  # the dashboard must never stop training
            self._fail(f"cannot connect to the visdom server at {server}:{port} ({err})")

    @property
    def enabled(self):
        return self._vis is not None

    def _fail(self, reason):
        self._vis = None
        warnings.warn(f"visdom dashboard disabled: {reason}. Training continues without it; "
                      f"start a server with `python -m visdom.server -bind_local` to see the plots "
                      f"(see README).", RuntimeWarning, stacklevel=3)

    def scalars(self, iteration, values, window, title=None, log_y=False):
        """Append one point per key of ``values`` to the line plot ``window`` (one trace per key).

        ``log_y`` gives the window a logarithmic y axis (for the learning rate, say); like the
        title it is set when the window is created.
        """
        if self._vis is None or not values:
            return
        import numpy as np

        names = list(values)
        ys = [float(values[name]) for name in names]
        ys = [y if math.isfinite(y) else float("nan") for y in ys]
        try:
            known = self._traces.get(window)
            if known is None:
                # First call: (re)create the window, replacing one left by an earlier run.
                self._vis.line(Y=np.array([ys]), X=np.full((1, len(ys)), float(iteration)),
                               win=window, env=self.env,
                               opts={"title": title or window, "legend": names,
                                     "xlabel": "iteration", "showlegend": True,
                                     "ytype": "log" if log_y else "linear"})
                self._traces[window] = names
            elif names == known:
                # Same traces in the same order: one request appends to all of them.
                self._vis.line(Y=np.array([ys]), X=np.full((1, len(ys)), float(iteration)),
                               win=window, env=self.env, update="append")
            else:
                # A different key set: append by trace name (the server adds unknown names).
                for name, y in zip(names, ys):
                    self._vis.line(Y=np.array([y]), X=np.array([float(iteration)]), win=window,
                                   env=self.env, update="append", name=name)
                    if name not in known:
                        known.append(name)
        except Exception as err:  # the dashboard must never stop training
            self._fail(f"updating window '{window}' failed ({err})")

    def captions(self, iteration, rows):
        """Replace the text pane with a table of (image id, generated caption, references)."""
        if self._vis is None:
            return
        cell = "<td style='padding:3px 14px 3px 0; vertical-align:top'>"
        lines = [f"<b>validation captions at iteration {iteration}</b>",
                 "<table>",
                 "<tr><th>image</th><th>generated</th><th>references</th></tr>"]
        for image_id, generated, references in rows:
            refs = "<br>".join(html.escape(ref) for ref in references)
            lines.append(f"<tr>{cell}{html.escape(str(image_id))}</td>"
                         f"{cell}{html.escape(generated)}</td>{cell}{refs}</td></tr>")
        lines.append("</table>")
        try:
            self._vis.text("\n".join(lines), win="captions", env=self.env,
                           opts={"title": "captions", "width": 700, "height": 400})
        except Exception as err:  # the dashboard must never stop training
            self._fail(f"updating the caption pane failed ({err})")

    def close(self):
        """Save the environment on the server (so it survives a restart) and stop sending."""
        if self._vis is None:
            return
        try:
            self._vis.save([self.env])
        except Exception as err:  # the dashboard must never stop training
            self._fail(f"saving the environment failed ({err})")
        self._vis = None
