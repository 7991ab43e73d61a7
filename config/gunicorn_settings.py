"""gunicorn's settings for the API (`gunicorn --config python:config.gunicorn_settings`): LaxCluster's log
format for gunicorn's own lines, the app's, and one access line per request. gunicorn reads every public
name here as a setting, so the helpers are imported under private names."""

from config import load as _load
from config.logs import dict_config as _dict_config

logconfig_dict = _dict_config(_load().section("logging"))
accesslog = "-"
