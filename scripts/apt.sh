# Sourced by the setup scripts: `apt_install PKG...` installs the Debian packages that are
# missing (one `apt-get update` per script run, none when everything is there).
apt_updated=0
apt_install() {
  local need=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" -eq 0 ]; then
      apt-get update -qq
      apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}
