"""
The control channel: AMP commands over a UNIX socket (L{commands}), the
server side that answers them through the controller (L{server}) and the
client the C{mproxy} commands use (L{client}).
"""
