#!/bin/sh
# Make a minimal busybox root filesystem in DIR from Debian's busybox-static,
# the offline base image every example and test starts from.
set -eu
dir=${1:?usage: busybox-rootfs.sh DIR}
bb=$(command -v busybox || echo /bin/busybox)
mkdir -p "$dir/bin" "$dir/etc" "$dir/tmp" "$dir/root" "$dir/proc" "$dir/sys" "$dir/dev"
chmod 1777 "$dir/tmp"
cp "$bb" "$dir/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$dir/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$dir/etc/group"
